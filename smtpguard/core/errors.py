"""One exception hierarchy. Every message says what went wrong and what to do."""


class SmtpguardError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with (1 = the job failed)."""

    exit_code = 1


class ConfigError(SmtpguardError):
    """Bad configuration or usage: the CLI prints one line and exits 2."""

    exit_code = 2


class InputError(SmtpguardError):
    """An input could not be opened or its format is unknown (not a bad record: those are dead letters)."""

    exit_code = 2


class StoreError(SmtpguardError):
    """The ClickHouse store failed or refused an operation."""


class StoreLockedError(StoreError):
    """The embedded store directory is owned by another process."""


class BrokerError(SmtpguardError):
    """Kafka could not be reached or refused an operation."""
