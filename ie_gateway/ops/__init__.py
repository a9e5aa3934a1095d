"""Running the node: health, metrics and the HTTP endpoint, TLS, the audit trail, admin actions,
webhooks, systemd notification, `check-config` checks, backup and restore."""
