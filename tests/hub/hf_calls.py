"""Calls of the stock huggingface_hub client, for the Rust end-to-end tests
(tests/src/hub.rs runs this with the pinned venv's Python).

Usage: python hf_calls.py OP JSON-ARGS
Prints one JSON line: {"ok": result} or {"error": {...}} for an exception
(its class, the classes it derives from, and the HTTP status if any). The
endpoint and token come from HF_ENDPOINT and HF_TOKEN, as for any user.
"""

import json
import sys

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.hf_api import RepoFile


def sibling(s):
    lfs = None if s.lfs is None else {"sha256": s.lfs.sha256, "size": s.lfs.size}
    return {"rfilename": s.rfilename, "size": s.size, "blob_id": s.blob_id, "lfs": lfs}


def node(n):
    if isinstance(n, RepoFile):
        lfs = None if n.lfs is None else {"sha256": n.lfs.sha256, "size": n.lfs.size}
        return {"type": "file", "path": n.path, "size": n.size, "blob_id": n.blob_id, "lfs": lfs}
    return {"type": "directory", "path": n.path, "tree_id": n.tree_id}


def info(i):
    return {
        "id": i.id,
        "sha": i.sha,
        "private": i.private,
        "last_modified": i.last_modified.isoformat() if i.last_modified else None,
        "created_at": i.created_at.isoformat() if i.created_at else None,
        "siblings": None if i.siblings is None else [sibling(s) for s in i.siblings],
        "class": type(i).__name__,
    }


def commit_info(c):
    return {"oid": c.oid, "url": c.commit_url}


def operation(o):
    """{"add": path, "text": str} or {"add": path, "file": local path}, {"delete": path}."""
    if "add" in o:
        data = o["file"] if "file" in o else o["text"].encode()
        return CommitOperationAdd(path_in_repo=o["add"], path_or_fileobj=data)
    return CommitOperationDelete(path_in_repo=o["delete"], is_folder=o.get("folder", "auto"))


def run(op, a):
    api = HfApi()
    repo = a.pop("repo", None)
    if op == "version":
        return huggingface_hub.__version__
    if op == "model_info":
        return info(api.model_info(repo, **a))
    if op == "dataset_info":
        return info(api.dataset_info(repo, **a))
    if op == "repo_info":
        return info(api.repo_info(repo, **a))
    if op == "list_repo_files":
        return api.list_repo_files(repo, **a)
    if op == "list_repo_tree":
        return [node(n) for n in api.list_repo_tree(repo, **a)]
    if op == "list_repo_refs":
        refs = api.list_repo_refs(repo, **a)
        as_list = lambda rs: [[r.name, r.ref, r.target_commit] for r in rs]
        out = {"branches": as_list(refs.branches), "tags": as_list(refs.tags)}
        if refs.pull_requests is not None:
            out["pull_requests"] = as_list(refs.pull_requests)
        return out
    if op == "list_repo_commits":
        return [
            {"id": c.commit_id, "title": c.title, "message": c.message, "authors": c.authors,
             "created_at": c.created_at.isoformat()}
            for c in api.list_repo_commits(repo, **a)
        ]
    if op == "file_exists":
        return api.file_exists(repo, **a)
    if op == "get_paths_info":
        return [node(n) for n in api.get_paths_info(repo, **a)]
    if op == "hf_hub_download":
        return hf_hub_download(repo, **a)
    if op == "snapshot_download":
        return snapshot_download(repo, **a)
    if op == "create_repo":
        return str(api.create_repo(repo, **a))
    if op == "upload_file":
        return commit_info(api.upload_file(repo_id=repo, **a))
    if op == "upload_folder":
        return commit_info(api.upload_folder(repo_id=repo, **a))
    if op == "delete_file":
        return commit_info(api.delete_file(repo_id=repo, **a))
    if op == "create_commit":
        ops = [operation(o) for o in a.pop("operations")]
        return commit_info(api.create_commit(repo, operations=ops, **a))
    if op == "create_branch":
        return api.create_branch(repo, **a)
    if op == "create_tag":
        return api.create_tag(repo, **a)
    raise SystemExit(f"unknown op {op}")


def main():
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        print(json.dumps({"ok": run(op, args)}))
    except Exception as e:  # the test asserts on the class
        response = getattr(e, "response", None)
        print(json.dumps({"error": {
            "type": type(e).__name__,
            "mro": [c.__name__ for c in type(e).__mro__],
            "status": getattr(response, "status_code", None),
            "message": str(e),
        }}))


if __name__ == "__main__":
    main()
