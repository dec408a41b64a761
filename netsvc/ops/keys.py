"""``netsvc key``: the manager's keyring, credentials issued from it, and TLS certificates.

- ``generate --out F``: a new keyring of one secret (mode 0600; ``F`` must not exist).
- ``issue --key-file F --role admin|read|agent [--host H] [--ttl S] [--out T]``: a credential
  signed by the keyring's first key (a host's agent gets ``--role agent --host H``).
- ``rotate --key-file F``: a new secret becomes the first line (new credentials are signed
  with it); the old ones stay, so every credential already issued keeps working. A running
  manager picks the change up within a second, without a restart.
- ``retire --key-file F``: drop every secret but the first, once the credentials have been
  re-issued: the old ones stop working at once.
- ``list --key-file F``: the key ids, the signing one first.
- ``tls-ca DIR`` / ``tls-cert DIR NAME --ip A [--dns N]``: a cluster CA and certificates
  (``netsvc.ops.tls``).

Invariants: every file written is written whole (a temporary then a rename) with mode 0600
(certificates 0644); a secret is never printed unless asked for (``generate`` without
``--out``); exit 2 with one line on stderr for any problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("key", help="the API keyring, credentials and TLS certificates",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="key_cmd", metavar="ACTION")
    g = sub.add_parser("generate", help="a new keyring of one secret")
    g.add_argument("--out", metavar="F", help="write it here (mode 0600); default: stdout")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("issue", help="a credential for an operator or a host's agent")
    i.add_argument("--key-file", metavar="F", required=True, help="the manager's keyring")
    i.add_argument("--role", choices=("admin", "read", "agent"), required=True)
    i.add_argument("--host", metavar="NAME", help="the agent's host (with --role agent)")
    i.add_argument("--ttl", metavar="S", type=float, default=None,
                   help="valid for S seconds (default: until its key is retired)")
    i.add_argument("--out", metavar="F", help="write it here (mode 0600); default: stdout")
    i.set_defaults(func=cmd_issue)
    r = sub.add_parser("rotate", help="put a new signing secret first, keep the old ones")
    r.add_argument("--key-file", metavar="F", required=True)
    r.set_defaults(func=cmd_rotate)
    t = sub.add_parser("retire", help="drop every secret but the signing one")
    t.add_argument("--key-file", metavar="F", required=True)
    t.set_defaults(func=cmd_retire)
    ls = sub.add_parser("list", help="the key ids, the signing one first")
    ls.add_argument("--key-file", metavar="F", required=True)
    ls.set_defaults(func=cmd_list)
    ca = sub.add_parser("tls-ca", help="a cluster CA (ca.pem, ca.key) in DIR")
    ca.add_argument("dir")
    ca.set_defaults(func=cmd_tls_ca)
    c = sub.add_parser("tls-cert", help="a certificate for NAME, signed by DIR's CA")
    c.add_argument("dir")
    c.add_argument("name")
    c.add_argument("--ip", action="append", default=[], help="an address it serves on")
    c.add_argument("--dns", action="append", default=[], help="a name it serves as")
    c.set_defaults(func=cmd_tls_cert)
    p.set_defaults(func=lambda a: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _fail(message: str) -> int:
    print(f"netsvc key: error: {message}", file=sys.stderr, flush=True)
    return 2


def _write_new(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_generate(args: argparse.Namespace) -> int:
    from netsvc.cluster.auth import generate_key, key_id

    secret = generate_key()
    if args.out is None:
        print(secret)
        return 0
    try:
        _write_new(args.out, secret + "\n")
    except OSError as exc:
        return _fail(f"cannot create {args.out}: {exc.strerror}")
    print(f"keyring {args.out}: key id {key_id(secret.encode())}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from netsvc.cluster.auth import KeyFileError, load_keyring

    try:
        keyring = load_keyring(args.key_file)
        if args.ttl is not None and args.ttl <= 0:
            raise KeyFileError("--ttl must be positive")
        expires = int(time.time() + args.ttl) + 1 if args.ttl is not None else 0
        token = keyring.issue(args.role, args.host, expires)
    except KeyFileError as exc:
        return _fail(str(exc))
    if args.out is None:
        print(token)
        return 0
    try:
        if os.path.exists(args.out):
            os.unlink(args.out)  # a re-issue replaces the old credential
        _write_new(args.out, token + "\n")
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror}")
    return 0


def _change(path: str, rotate: bool) -> int:
    from netsvc.cluster.auth import (
        MAX_KEYS,
        KeyFileError,
        Keyring,
        generate_key,
        load_keyring,
        write_keyring,
    )

    try:
        old = load_keyring(path)
        if rotate:
            if len(old.secrets) >= MAX_KEYS:
                raise KeyFileError(f"{path} holds {MAX_KEYS} keys already: retire first")
            new = Keyring((generate_key().encode("ascii"), *old.secrets))
        else:
            new = Keyring(old.secrets[:1])
        write_keyring(path, new)
    except KeyFileError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror}")
    print(f"keyring {path}: key ids {', '.join(new.ids)} (signing: {new.ids[0]})")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    return _change(args.key_file, rotate=True)


def cmd_retire(args: argparse.Namespace) -> int:
    return _change(args.key_file, rotate=False)


def cmd_list(args: argparse.Namespace) -> int:
    from netsvc.cluster.auth import KeyFileError, load_keyring

    try:
        keyring = load_keyring(args.key_file)
    except KeyFileError as exc:
        return _fail(str(exc))
    for i, kid in enumerate(keyring.ids):
        print(f"{kid}{'  (signing)' if i == 0 else ''}")
    return 0


def cmd_tls_ca(args: argparse.Namespace) -> int:
    from netsvc.ops.tls import TlsError, make_ca

    try:
        print(make_ca(args.dir))
    except TlsError as exc:
        return _fail(str(exc))
    return 0


def cmd_tls_cert(args: argparse.Namespace) -> int:
    from netsvc.ops.tls import TlsError, make_cert

    try:
        cert, key = make_cert(args.dir, args.name, args.ip, args.dns)
    except (TlsError, ValueError) as exc:
        return _fail(str(exc))
    print(cert)
    print(key)
    return 0
