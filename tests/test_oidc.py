"""Single sign-on: the embedded API server accepts a real OpenID Connect issuer's ID tokens (the
suite's own issuer, signing RS256 JWTs with keys it makes), configured as kube-apiserver's
``--oidc-*`` flags are; ``vmo login`` signs in through the device flow and writes a kubeconfig
whose exec plugin kubectl and ``vmo`` both run."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import Api
from vmo.apiserver.oidc import OIDCConfig, OIDCConfigError
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.oidc import ThreadedIssuer

JSON = dict[str, Any]
CLIENT = "vmo"
NS = "sso"
WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


@pytest.fixture(scope="module")
def sso(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ThreadedServer, ThreadedIssuer]]:
    issuer = ThreadedIssuer(tmp_path_factory.mktemp("issuer"), id_token_seconds=20).start()
    config = OIDCConfig(issuer.url, CLIENT, username_claim="email", groups_claim="groups",
                        groups_prefix="oidc:", ca_file=issuer.ca_file)  # fmt: skip
    server = ThreadedServer(tmp_path_factory.mktemp("vmo-sso"), oidc=config).start()
    admin = Api(server.url, server.ca, server.admin_token)
    assert admin.post("/api/v1/namespaces", {"metadata": {"name": NS}}).status_code == 201
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "dba-view", "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "kubevirt.io:view"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                             "name": "oidc:dba"}]}  # fmt: skip
    assert admin.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
                      binding).status_code == 201  # fmt: skip
    yield server, issuer
    server.stop()
    issuer.stop()


def whoami(server: ThreadedServer, token: str) -> tuple[int, JSON]:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    answer = Api(server.url, server.ca, token).post(WHOAMI, body)
    return answer.status_code, answer.json()


def alice(who: ThreadedIssuer, **kw: Any) -> str:
    claims = {"sub": "u-123", "email": "alice@example.test", "email_verified": True,
              "groups": ["dba"]}  # fmt: skip
    return who.mint(claims, **{"audience": CLIENT, **kw})


def test_an_issuer_s_id_token_is_a_user_with_its_claims_prefixes(
    sso: tuple[ThreadedServer, ThreadedIssuer],
) -> None:
    server, issuer = sso
    code, review = whoami(server, alice(issuer))
    assert code == 201, review
    user = review["status"]["userInfo"]
    assert user["username"] == "alice@example.test"  # the email claim: no prefix, as upstream
    assert "oidc:dba" in user["groups"] and "system:authenticated" in user["groups"]
    vms = Api(server.url, server.ca, alice(issuer)).get(
        f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
    )
    assert vms.status_code == 200  # the group's RoleBinding applies


def test_bad_signatures_expired_tokens_wrong_audience_and_issuer_are_refused(
    sso: tuple[ThreadedServer, ThreadedIssuer],
) -> None:
    server, issuer = sso
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "signed by another key": alice(issuer, key=other),
        "expired": alice(issuer, seconds=-60),
        "for another client": alice(issuer, audience="someone-else"),
        "from another issuer": alice(issuer, issuer="https://evil.example.test"),
        "a key the issuer never published": alice(issuer, kid="k9"),
        "unverified email": issuer.mint(
            {"sub": "m", "email": "m@example.test", "email_verified": False}, audience=CLIENT
        ),
        "not a JWT": "not.a.token",
    }
    for what, token in cases.items():
        code, body = whoami(server, token)
        assert code == 401, f"{what}: {code} {body}"
    assert whoami(server, alice(issuer))[0] == 201  # and a good one still passes


def test_the_flags_are_checked_as_kube_apiserver_checks_them() -> None:
    with pytest.raises(OIDCConfigError, match="must be an https URL"):
        OIDCConfig("http://issuer.example.test", CLIENT)
    with pytest.raises(OIDCConfigError, match="--oidc-client-id"):
        OIDCConfig("https://issuer.example.test", "")
    assert OIDCConfig("https://i.example.test", CLIENT).prefix == "https://i.example.test#"
    assert OIDCConfig("https://i.example.test", CLIENT, username_prefix="-").prefix == ""


def test_vmo_login_signs_in_by_the_device_flow_and_kubectl_uses_its_exec_plugin(
    sso: tuple[ThreadedServer, ThreadedIssuer], tmp_path: Path
) -> None:
    server, issuer = sso
    kubeconfig = tmp_path / "sso.kubeconfig"
    argv = [sys.executable, "-m", "vmo.cli.main", "--home", str(server.home), "login",
            "--issuer-url", issuer.url, "--client-id", CLIENT, "--ca-file", issuer.ca_file,
            "-n", NS, "-o", str(kubeconfig)]  # fmt: skip
    login = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert login.stderr is not None
    prompt = login.stderr.readline() + login.stderr.readline()
    code = re.search(r"enter the code (\S+)", prompt)
    assert code is not None, prompt
    assert code.group(1) in issuer.pending_codes()
    # the person at the browser signs in and approves; the CLI's polling picks it up
    threading.Timer(1.5, issuer.approve, (code.group(1), "u-7"),
                    {"email": "alice@example.test", "groups": ("dba",)}).start()  # fmt: skip
    out, err = login.communicate(timeout=60)
    assert login.returncode == 0, err
    assert "signed in as u-7" in out and kubeconfig.exists()
    assert kubeconfig.stat().st_mode & 0o077 == 0
    # kubectl runs the exec plugin, which refreshes the 20 s token from the refresh token
    listed = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "vm", "-n", NS],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    denied = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "secrets", "-n", NS],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert denied.returncode != 0 and 'User "alice@example.test"' in denied.stderr, denied.stderr
    # and so does VMO's own client
    mine = subprocess.run([sys.executable, "-m", "vmo.cli.main", "vm", "ls", "-n", NS,
                           "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert mine.returncode == 0, mine.stderr
    token = subprocess.run(
        [sys.executable, "-m", "vmo.cli.main", "--home", str(server.home), "login", "token",
         "--issuer-url", issuer.url, "--client-id", CLIENT, "--ca-file", issuer.ca_file],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert token.returncode == 0 and '"kind": "ExecCredential"' in token.stdout, token.stderr
