"""A real etcd with TLS, client certificates and authentication on: its own test CA (made
with openssl), a server certificate for 127.0.0.1, a client certificate, and a root user."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.harness.etcd import EtcdServer

PASSWORD = "etcd-root-password-0123"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> dict[str, Path]:
    """ca.pem, server.pem/.key (127.0.0.1) and client.pem/.key, signed by a fresh CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=dynamo-vllm test CA", cwd=directory)
    # etcd's JSON gateway dials its own gRPC server with the server certificate as a client
    # certificate: with --client-cert-auth, that one needs clientAuth too.
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=dynamo-vllm-{name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=directory)
        os.chmod(directory / f"{name}.key", 0o600)
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key",
                                                "client.pem", "client.key")}


class SecureEtcd(EtcdServer):
    """https only; with `client_cert_auth` a client certificate is required, otherwise
    `enable_auth` turns on etcd's users (root). etcd 3.4's JSON gateway refuses a request
    that carries both ("CommonName of client sending a request against gateway will be
    ignored"), so a deployment uses one or the other."""

    def __init__(self, directory: Path, client_cert_auth: bool):
        super().__init__(directory / "data", directory / "etcd.log")
        self.certs = make_certificates(directory / "pki")
        self.client_cert_auth = client_cert_auth
        self.url = f"https://127.0.0.1:{self.client_port}"
        self.extra_args = ["--cert-file", str(self.certs["server.pem"]),
                           "--key-file", str(self.certs["server.key"])]
        if client_cert_auth:  # (a trusted CA alone turns client certificates on too)
            self.extra_args += ["--trusted-ca-file", str(self.certs["ca.pem"]),
                                "--client-cert-auth"]
        self.token: str | None = None

    def client(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.certs["ca.pem"]))
        if self.client_cert_auth:
            context.load_cert_chain(self.certs["client.pem"], self.certs["client.key"])
        return httpx.Client(verify=context, timeout=5)

    def healthy(self) -> bool:
        try:
            with self.client() as client:
                return client.get(self.url + "/health").json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def enable_auth(self) -> None:
        for path, body in (("/v3/auth/user/add", {"name": "root", "password": PASSWORD}),
                           ("/v3/auth/role/add", {"name": "root"}),
                           ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                           ("/v3/auth/enable", {})):
            self.call(path, body)
        with self.client() as client:
            answer = client.post(self.url + "/v3/auth/authenticate",
                                 json={"name": "root", "password": PASSWORD})
            answer.raise_for_status()
            self.token = answer.json()["token"]

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": self.token} if self.token else {}
        with self.client() as client:
            resp = client.post(self.url + path, json=body, headers=headers)
        resp.raise_for_status()
        return dict(resp.json())
