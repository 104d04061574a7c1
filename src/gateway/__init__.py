"""itpison-gateway: an SMTP smarthost gateway relaying to the ITPison mail relay."""

__version__ = "0.1.0"
