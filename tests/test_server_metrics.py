"""vLLM's metric names on /metrics (engine/server/metrics.py): each equals rast's own figure it mirrors,
labelled with the served model name, and the request counts match the requests made."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_util import MODEL, Running


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _vllm(samples: dict, name: str, **labels: str) -> float:
    return samples[(f"vllm:{name}", tuple(sorted({"model_name": MODEL, **labels}.items())))]


def test_vllms_metric_names_mirror_rasts(srv: Running) -> None:
    before = _samples(srv.url)
    client = srv.client()
    done = client.completions.create(model=MODEL, prompt=["the cat", "3 + 5 ="], max_tokens=3, n=2, temperature=0.5)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    reasons = [c.finish_reason for c in done.choices + chat.choices]
    after = _samples(srv.url)

    def delta(name: str, rast: bool = False, **labels: str) -> float:
        if rast:
            return after[(name, ())] - before.get((name, ()), 0.0)
        key = (f"vllm:{name}", tuple(sorted({"model_name": MODEL, **labels}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for reason in ("length", "stop"):  # 2 prompts x n=2, and the chat
        assert delta("request_success_total", finished_reason=reason) == reasons.count(reason), reason
    assert delta("time_to_first_token_seconds_count") == delta("rast_time_to_first_token_seconds_count", True) == 2
    assert delta("e2e_request_latency_seconds_count") == delta("rast_request_seconds_count", True) == 2
    for ours, theirs in (("rast_prompt_tokens_total", "prompt_tokens_total"),
                         ("rast_generation_tokens_total", "generation_tokens_total"),
                         ("rast_num_requests_running", "num_requests_running"),
                         ("rast_num_requests_waiting", "num_requests_waiting"),
                         ("rast_spec_draft_tokens_total", "spec_decode_num_draft_tokens_total")):
        assert after[(ours, ())] == _vllm(after, theirs), theirs
    assert _vllm(after, "kv_cache_usage_perc") == after[("rast_kv_blocks_used", ())] / after[("rast_kv_blocks_total", ())]
    assert _vllm(after, "num_preemptions_total") == srv.server.engine.engine.scheduler.num_preemptions
