"""Rollouts: the SGLang client, server management, the embedded server and weight sync."""
