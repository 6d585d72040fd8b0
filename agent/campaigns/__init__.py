"""Campaigns: collection rules the cloud pushes to vehicles, signed with Ed25519, verified,
kept in state_dir and run beside the config file's rules (docs/campaigns.md)."""
