"""StoreService's key RPCs answer admin keys only (static or stored), on a real mesh; the lookup by hash that
the edge and chat_svc make stays open; `chatterbot keys` sends the admin key."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from chatterbot.v1 import store_pb2, store_pb2_grpc
from ops.launcher import Mesh
from tests.clients import create_key, keys_cli, new_user
from tests.meshes import ADMIN_KEY, API_KEY

REPO_ROOT = Path(__file__).resolve().parent.parent

Call = Callable[[store_pb2_grpc.StoreServiceStub, tuple[tuple[str, str], ...]], object]


@pytest.fixture
def store(mesh: Mesh) -> Iterator[store_pb2_grpc.StoreServiceStub]:
    with grpc.insecure_channel(mesh.services["store"].url) as channel:
        yield store_pb2_grpc.StoreServiceStub(channel)


def as_key(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def random_hash() -> bytes:
    return hashlib.sha256(uuid.uuid4().bytes).digest()


def key_rpcs(target_key_id: str, minted_hash: bytes) -> dict[str, Call]:
    """Every key-managing RPC, each a call that an admin key would have served."""

    def create(stub: store_pb2_grpc.StoreServiceStub, metadata: tuple[tuple[str, str], ...]) -> object:
        request = store_pb2.CreateApiKeyRequest(
            key_hash=minted_hash, prefix="cb_" + uuid.uuid4().hex[:8], kind=store_pb2.API_KEY_KIND_ADMIN
        )
        return stub.CreateApiKey(request, metadata=metadata, timeout=10)

    def update(stub: store_pb2_grpc.StoreServiceStub, metadata: tuple[tuple[str, str], ...]) -> object:
        request = store_pb2.UpdateApiKeyRequest(
            key_id_or_prefix=target_key_id, api_key=store_pb2.ApiKey(requests_per_minute=99999)
        )
        request.update_mask.paths.append("requests_per_minute")
        return stub.UpdateApiKey(request, metadata=metadata, timeout=10)

    return {
        "CreateApiKey": create,
        "ListApiKeys": lambda stub, md: stub.ListApiKeys(
            store_pb2.ListApiKeysRequest(), metadata=md, timeout=10
        ),
        "RevokeApiKey": lambda stub, md: stub.RevokeApiKey(
            store_pb2.RevokeApiKeyRequest(key_id_or_prefix=target_key_id), metadata=md, timeout=10
        ),
        "UpdateApiKey": update,
    }


def refused_with(call: Call, stub: store_pb2_grpc.StoreServiceStub, metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call(stub, metadata)
    return refused.value


def admin_of_store(store, key_hash: bytes) -> store_pb2.ApiKey | None:
    """The stored key with this hash, asked as the mesh asks (GetApiKey, no credential); None if none."""
    try:
        return store.GetApiKey(store_pb2.GetApiKeyRequest(key_hash=key_hash), timeout=10).api_key
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return None


def test_key_rpcs_without_a_key_are_unauthenticated_and_mint_nothing(mesh, store):
    target = create_key(mesh, "--service", "--rpm", "5")
    minted = random_hash()
    for name, call in key_rpcs(target.key_id, minted).items():
        refusal = refused_with(call, store, ())
        assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "admin key" in (refusal.details() or ""), name
    assert admin_of_store(store, minted) is None
    untouched = admin_of_store(store, hashlib.sha256(target.key.encode()).digest())
    assert untouched is not None
    assert (untouched.requests_per_minute, untouched.HasField("revoke_time")) == (5, False)


def test_key_rpcs_refuse_user_service_and_unknown_keys(mesh, store):
    target = create_key(mesh, "--service", "--rpm", "5")
    callers = {
        "user key": create_key(mesh, "--user", new_user()).key,
        "stored service key": create_key(mesh, "--service").key,
        "static service key": API_KEY,
        "unknown key": "cb_" + uuid.uuid4().hex * 2,
        "unknown static-looking key": "not-a-key",
    }
    minted = random_hash()
    for who, key in callers.items():
        for name, call in key_rpcs(target.key_id, minted).items():
            refusal = refused_with(call, store, as_key(key))
            assert refusal.code() == grpc.StatusCode.PERMISSION_DENIED, (who, name, refusal)
    assert admin_of_store(store, minted) is None
    untouched = admin_of_store(store, hashlib.sha256(target.key.encode()).digest())
    assert untouched is not None
    assert (untouched.requests_per_minute, untouched.HasField("revoke_time")) == (5, False)


@pytest.mark.parametrize("admin", ["static", "stored"])
def test_static_and_stored_admin_keys_manage_keys(mesh, store, admin):
    key = ADMIN_KEY if admin == "static" else create_key(mesh, "--admin", "--name", "ops").key
    target = create_key(mesh, "--service", "--rpm", "5")
    minted = random_hash()
    rpcs = key_rpcs(target.key_id, minted)

    created = rpcs["CreateApiKey"](store, as_key(key))
    assert created.api_key.kind == store_pb2.API_KEY_KIND_ADMIN
    listed = rpcs["ListApiKeys"](store, as_key(key))
    assert {target.key_id, created.api_key.key_id} <= {k.key_id for k in listed.api_keys}
    assert rpcs["UpdateApiKey"](store, as_key(key)).api_key.requests_per_minute == 99999
    assert rpcs["RevokeApiKey"](store, as_key(key)).api_key.HasField("revoke_time")
    assert admin_of_store(store, minted).key_id == created.api_key.key_id


def test_a_revoked_admin_key_stops_managing_keys(mesh, store):
    admin = create_key(mesh, "--admin")
    listing = key_rpcs("", b"")["ListApiKeys"]
    listing(store, as_key(admin.key))
    assert keys_cli(mesh, "revoke", admin.key_id).returncode == 0
    # Within the cache time of the store's resolver (CHATTERBOT_API_KEY_CACHE_SECONDS, 5 s here).
    deadline = time.monotonic() + 15
    while True:
        try:
            listing(store, as_key(admin.key))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            break
        assert time.monotonic() < deadline, "a revoked admin key still manages keys"
        time.sleep(0.5)


def cli_env(mesh: Mesh, data_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The mesh's settings without its static admin keys (and with another data dir when given)."""
    env = {k: v for k, v in mesh.services["chat"].env.items() if k != "CHATTERBOT_ADMIN_KEYS"}
    if data_dir is not None:
        env["CHATTERBOT_DATA_DIR"] = str(data_dir)
    return {**env, **extra}


def keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("chatterbot")), "keys", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_keys_cli_sends_the_admin_key_it_is_given_or_finds(mesh, tmp_path):
    # The mesh's static admin key (CHATTERBOT_ADMIN_KEYS), as every other test of the CLI runs it.
    stored_admin = create_key(mesh, "--admin")
    user = new_user()

    # None anywhere: a clear error before any call.
    nowhere = keys(cli_env(mesh, tmp_path), "create", "--user", user)
    assert nowhere.returncode == 2 and "needs an admin key" in nowhere.stderr and not nowhere.stdout

    # The wrong kind of key: store_svc refuses it.
    user_key = create_key(mesh, "--user", user).key
    refused = keys(cli_env(mesh, tmp_path, CHATTERBOT_ADMIN_KEY=user_key), "list")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr

    # CHATTERBOT_ADMIN_KEY, and --admin-key over it.
    by_env = keys(cli_env(mesh, tmp_path, CHATTERBOT_ADMIN_KEY=stored_admin.key), "create", "--user", user)
    assert by_env.returncode == 0 and by_env.stdout.startswith("cb_"), by_env.stderr
    by_flag = keys(
        cli_env(mesh, tmp_path, CHATTERBOT_ADMIN_KEY=user_key), "list", "--admin-key", stored_admin.key
    )
    assert by_flag.returncode == 0 and stored_admin.key_id in by_flag.stdout, by_flag.stderr

    # The running `chatterbot up`'s, from its up.json, for the store that up.json names only.
    up = json.loads((mesh.data_dir / "up.json").read_text())
    assert up["admin_key"] == ADMIN_KEY
    beside_up = keys(cli_env(mesh), "list", "--user", user)
    assert beside_up.returncode == 0 and user in beside_up.stdout, beside_up.stderr
    elsewhere = keys(cli_env(mesh), "list", "--store", "127.0.0.1:1")
    assert elsewhere.returncode == 2 and "needs an admin key" in elsewhere.stderr
