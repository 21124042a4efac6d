"""The relay: ``twistd twistmail``, SMTP submission in, a durable queue, delivery out."""
