"""The gRPC front end of MedHallGuard: wire types, servicers, the server and the CLI.

`guard/` never imports from here; this package turns wire messages into
`guard.types` and typed errors into status codes, and nothing more.
"""
