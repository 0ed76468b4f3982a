"""A model from the (stand-in) hub placed across two real nodes: each downloads only its
share, the progress shows in the cluster's state, and then the pipeline answers."""

import json
from pathlib import Path
from typing import Any

from shoal_worker.downloads.shard_files import files_for_shard

from .cluster_harness import ClusterNode, agreed, cluster, wait_until
from .hf_standin import INDEX_FILE, StandardRepos, StandInProcess, repo_dir

# Slow enough that each node's download spans several progress events.
HUB_BYTES_PER_SECOND = 16 * 1024 * 1024


def weight_files_on(node: ClusterNode, repo: str) -> set[str]:
    return {path.name for path in (node.home / "models" / "hub" / repo).glob("*.safetensors")}


def test_a_two_node_pipeline_downloads_each_share_then_answers(
    tmp_path: Path, standin_repos: StandardRepos
) -> None:
    repo = standin_repos.split
    with cluster(tmp_path, 3) as all_nodes:
        nodes, hub_node = all_nodes[:2], all_nodes[2]
        # The hub runs on a third "host" of its own (or on loopback beside the nodes).
        host = hub_node.host
        with StandInProcess(
            standin_repos.root,
            host=host.address if host is not None else "127.0.0.1",
            wrap=host.command if host is not None else None,
            bytes_per_second=HUB_BYTES_PER_SECOND,
        ) as hub:
            for node in nodes:
                node.start(environment={"HF_ENDPOINT": hub.url})
            wait_until("two nodes agreeing", 90, lambda: agreed(nodes), nodes)
            entry = nodes[0]

            card = entry.http("POST", "/models/add", {"model_id": repo})
            assert card["model_id"] == repo, card
            assert (card["layers"], card["architecture"]) == (30, "llama")
            refused = entry.http("POST", "/models/add", {"model_id": standin_repos.unsupported})
            assert "not supported by mlx-lm" in refused["error"]["message"]

            ids = [node.node_id() for node in nodes]
            placed = entry.http(
                "POST", "/instance", {"model_id": repo, "sharding": "pipeline", "node_ids": ids}
            )
            assert "instance_id" in placed, placed
            seen: dict[str, set[str]] = {node_id: set() for node_id in ids}
            ongoing_samples: list[dict[str, Any]] = []

            def ready() -> bool:
                state = entry.state()
                for node_id, by_model in state["downloads"].items():
                    record = by_model.get(repo)
                    if record is not None:
                        seen[node_id].add(record["status"]["status"])
                        if record["status"]["status"] == "ongoing":
                            ongoing_samples.append(record["status"])
                instance = state["instances"].get(placed["instance_id"])
                if instance is None:
                    return False
                runners = [state["runners"].get(shard["runner_id"]) for shard in instance["shards"]]
                return all(r is not None and r["status"]["status"] == "ready" for r in runners)

            wait_until("the downloaded pipeline to be ready", 240, ready, nodes)
            for node_id in ids:
                assert {"ongoing", "completed"} <= seen[node_id], seen
            sample = ongoing_samples[0]
            assert 0 < sample["bytes_done"] <= sample["bytes_total"]
            assert sample["files"]

            index = json.loads((repo_dir(standin_repos.root, repo) / INDEX_FILE).read_text())
            instance = entry.state()["instances"][placed["instance_id"]]
            all_weights = set(index["weight_map"].values())
            for node in nodes:
                shard = next(s for s in instance["shards"] if s["node_id"] == node.node_id())
                share = files_for_shard(
                    all_weights, index["weight_map"], shard["start_layer"], shard["end_layer"]
                )
                assert weight_files_on(node, repo) == share
                assert share != all_weights

            reply = nodes[1].http(
                "POST",
                "/v1/chat/completions",
                {
                    "model": repo,
                    "temperature": 0,
                    "max_tokens": 12,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                },
                timeout=120,
            )
            assert "Paris" in reply["choices"][0]["message"]["content"], reply
            listed = {model["id"]: model for model in entry.http("GET", "/v1/models")["data"]}
            assert {d["node_id"] for d in listed[repo]["downloads"]} == set(ids)
