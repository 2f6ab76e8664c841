"""How this node reaches a secured etcd: TLS (the CA that signs etcd's certificate, a
client certificate when etcd asks for one) and etcd's own authentication (a user whose
password lives in a private file). One source for the agent's etcd client and for Dynamo's
runtime, which reads the same settings from its ETCD_AUTH_* variables."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

from dynamo_vllm.contract.secrets import SecretFileError, read_private_file

AccessError = SecretFileError

@dataclass(frozen=True)
class EtcdAccess:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    user: str = ""
    password_file: str = ""

    @classmethod
    def of(cls, discovery: Any) -> EtcdAccess:
        """From the [discovery] section."""
        return cls(discovery.etcd_ca_file, discovery.etcd_cert_file, discovery.etcd_key_file,
                   discovery.etcd_user, discovery.etcd_password_file)

    def problems(self, check_paths: bool) -> list[str]:
        """`discovery.KEY: problem` for each setting that cannot work."""
        found = []
        if bool(self.cert_file) != bool(self.key_file):
            found.append("discovery.etcd_cert_file: etcd_cert_file and etcd_key_file go "
                         "together")
        if bool(self.user) != bool(self.password_file):
            found.append("discovery.etcd_user: etcd_user and etcd_password_file go together")
        if not check_paths:
            return found
        for key, path in (("etcd_ca_file", self.ca_file), ("etcd_cert_file", self.cert_file)):
            if path and not os.access(path, os.R_OK):
                found.append(f"discovery.{key}: cannot read {path}")
        for key, path in (("etcd_key_file", self.key_file),
                          ("etcd_password_file", self.password_file)):
            if path:
                try:
                    read_private_file(path)
                except AccessError as exc:
                    found.append(f"discovery.{key}: {exc}")
        if not found and (self.ca_file or self.cert_file):
            try:
                self.ssl_context()
            except (OSError, ssl.SSLError) as exc:
                found.append(f"discovery.etcd_ca_file: the TLS files do not load: {exc}")
        return found

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def password(self) -> str:
        """Read at each authentication: a rotated password takes effect without a restart."""
        return read_private_file(self.password_file).decode("utf-8", "replace").strip()

    def dynamo_environment(self) -> dict[str, str]:
        """The same access for Dynamo's runtime (its ETCD_AUTH_* variables)."""
        env = {}
        for name, value in (("ETCD_AUTH_CA", self.ca_file),
                            ("ETCD_AUTH_CLIENT_CERT", self.cert_file),
                            ("ETCD_AUTH_CLIENT_KEY", self.key_file),
                            ("ETCD_AUTH_USERNAME", self.user)):
            if value:
                env[name] = value
        if self.user and self.password_file:
            env["ETCD_AUTH_PASSWORD"] = self.password()
        return env
