"""`ci-admin`: the operators' command for users and API keys, run on the database host."""
