"""A real OpenLDAP slapd for tests (twisted-notes §6): its own temp dir, free ports for
ldap:// (StartTLS) and ldaps://, a certificate from the test CA, loaded from an LDIF with
people, groups and a service account.  ``stop()`` / ``start()`` (same ports, same data),
``freeze()`` / ``thaw()`` (SIGSTOP / SIGCONT)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from procrig import ServerProcess, free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SUFFIX = "dc=example,dc=test"
SERVICE_DN = f"cn=gw,ou=svc,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "dave": "dave-pw", "twin1": "twin-pw",
             "twin2": "twin-pw", "star": "star-pw"}

# A few attributes the stock schemas lack: AD's proxyAddresses and userPrincipalName, a
# plain memberOf (what AD and the memberof overlay provide), and two site attributes.
SCHEMA = """\
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'proxyAddresses' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.3.6.1.4.1.55555.1.2 NAME 'memberOf' EQUALITY distinguishedNameMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
attributetype ( 1.3.6.1.4.1.55555.1.3 NAME 'mailRateClass' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.4 NAME 'mailOptionDefault' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.3.6.1.4.1.55555.1.5 NAME 'userPrincipalName' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'gatewayUser' SUP top AUXILIARY
  MAY ( proxyAddresses $ memberOf $ mailRateClass $ mailOptionDefault $ userPrincipalName ) )
"""


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _person(uid: str, mail: str, *extra: str) -> str:
    lines = [f"dn: uid={uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson",
             "objectClass: gatewayUser", f"uid: {uid}", f"cn: {uid}", f"sn: {uid}",
             f"mail: {mail}", f"userPassword: {ssha(PASSWORDS[uid])}", *extra]
    return "\n".join(lines) + "\n\n"


def ldif() -> str:
    relay, staff = f"cn=relay,ou=groups,{SUFFIX}", f"cn=staff,ou=groups,{SUFFIX}"
    people = f"ou=people,{SUFFIX}"
    out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
           "o: Example\n\n"]
    for ou in ("people", "groups", "svc"):
        out.append(f"dn: ou={ou},{SUFFIX}\nobjectClass: organizationalUnit\nou: {ou}\n\n")
    out.append(f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
               f"cn: gw\nuserPassword: {ssha(SERVICE_PASSWORD)}\n\n")
    out.append(_person("alice", "alice@example.test",
                       "proxyAddresses: SMTP:alice@example.test",
                       "proxyAddresses: smtp:a.smith@example.test",
                       "proxyAddresses: X500:/o=Example/cn=alice",
                       "proxyAddresses: sip:alice@example.test",
                       "userPrincipalName: alice@corp.example",
                       "mailRateClass: bulk",
                       "mailOptionDefault: job_option=CreateReport",
                       f"memberOf: {relay}"))
    out.append(_person("bob", "bob@example.test", f"memberOf: {staff}"))
    out.append(_person("dave", "dave@example.test", f"memberOf: {relay}"))
    out.append(_person("twin1", "twin@example.test", f"memberOf: {relay}"))
    out.append(_person("twin2", "twin@example.test", f"memberOf: {relay}"))
    out.append(_person("star", "star@example.test", f"memberOf: {relay}"))
    out.append(f"dn: {relay}\nobjectClass: groupOfNames\ncn: relay\n"
               f"member: uid=alice,{people}\nmember: uid=dave,{people}\n"
               f"member: uid=twin1,{people}\nmember: uid=twin2,{people}\n"
               f"member: uid=star,{people}\n\n")
    out.append(f"dn: {staff}\nobjectClass: groupOfNames\ncn: staff\nmember: uid=bob,{people}\n\n")
    return "".join(out)


class Slapd(ServerProcess):
    def __init__(self, workdir: Path, test_ca: Any) -> None:
        if not os.access(SLAPD, os.X_OK):
            raise RuntimeError("slapd is not installed: scripts/test.sh installs slapd and"
                               " ldap-utils")
        self.dir = workdir
        self.ca_pem = test_ca.ca_pem
        cert = test_ca.issue("slapd", "localhost", "127.0.0.1")
        self.port, self.ldaps_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        (workdir / "db").mkdir()
        (workdir / "gateway.schema").write_text(SCHEMA)
        (workdir / "data.ldif").write_text(ldif())
        includes = "".join(f"include /etc/ldap/schema/{name}.schema\n"
                           for name in ("core", "cosine", "inetorgperson", "nis"))
        (workdir / "slapd.conf").write_text(
            f"{includes}include {workdir}/gateway.schema\n"
            f"pidfile {workdir}/slapd.pid\nargsfile {workdir}/slapd.args\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            f"TLSCertificateFile {cert.cert}\nTLSCertificateKeyFile {cert.key}\n"
            f"TLSCACertificateFile {self.ca_pem}\n"
            f"database mdb\nmaxsize 10485760\nsuffix \"{SUFFIX}\"\n"
            f"rootdn \"cn=admin,{SUFFIX}\"\nrootpw {ssha('admin-pw')}\n"
            f"directory {workdir}/db\n"
            "access to attrs=userPassword by self =xw by anonymous auth by * none\n"
            f"access to * by dn.exact=\"{SERVICE_DN}\" read by self read by * none\n")
        subprocess.run([SLAPADD, "-f", str(workdir / "slapd.conf"), "-l",
                        str(workdir / "data.ldif")], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SLAPD, "-f", str(self.dir / "slapd.conf"), "-h",
             f"{self.url}/ {self.ldaps_url}/", "-d", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                socket.create_connection(("127.0.0.1", self.ldaps_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("slapd did not start listening within 15 s")

    def stop(self) -> None:
        self.end(graceful=True)
