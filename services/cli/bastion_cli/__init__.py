"""The ``bastion`` command: run the local platform, mint tokens, build models."""
