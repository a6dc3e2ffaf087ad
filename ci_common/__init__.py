"""Shared vocabulary of the CI service: models, errors, settings and the repository interface."""
