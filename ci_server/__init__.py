"""The CI service's HTTP API: stateless FastAPI replicas over the shared repository.

Build an app with `ci_server.app.create_app(settings, repository)`; uvicorn serves
`ci_server.app:app`. Never imports the docker SDK.
"""
