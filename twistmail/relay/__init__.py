"""The relay: ``twistd twistmail`` (or ``twistmail serve``), a durable local mail relay.

Applications submit mail over SMTP (:mod:`.submission`); each message is committed to the
queue before it is acknowledged; a worker (:mod:`.worker`) delivers it upstream through one
pooled :class:`~twistmail.Mailer`. Options and the service: :mod:`.tap`, :mod:`.service`.
"""

from typing import Final

DEFAULT_USERS_FILE: Final = "twistmail-users"
"""The users file when none is named (in the working directory). Defined here, not in
:mod:`.users`, so that ``twistmail --help`` names it without importing the hashing code."""
