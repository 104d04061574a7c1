"""twistd plugin: ``twistd -n itpison-gateway``.

Import nothing heavy here: importing twisted.mail.smtp installs the reactor and breaks
``twistd --reactor=...`` (twisted-notes §4).  The ServiceMaker names the module lazily.
"""

from twisted.application.service import ServiceMaker

itpisonGateway = ServiceMaker(
    "itpison-gateway",
    "gateway.tap",
    "SMTP relay gateway to the ITPison mail relay",
    "itpison-gateway",
)
