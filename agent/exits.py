"""Exit statuses of the commands, from sysexits.h, for the service manager to tell apart."""

#: A config that does not validate (`check-config`, `run`): restarting cannot fix it.
EX_CONFIG = 78
#: The spool under state_dir cannot be used (`run`).
EX_IOERR = 74
