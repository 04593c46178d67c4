"""Plumbing shared by every Bastion service: settings, keys, messages, errors, logging."""
