"""Concurrent requests are batched together, answered correctly, and counted in the metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import tritonclient.grpc as triton

from compression.models.digits.data import load_splits, normalize
from tests.serving import ServerThread, sample_value, scrape


def test_64_concurrent_requests_share_batches(digits_server: ServerThread) -> None:
    split = load_splits()["test"]
    images, labels = normalize(split.images[:64]), split.labels[:64]
    before = scrape(digits_server)["slimserve_batch_size"]
    client = triton.InferenceServerClient(digits_server.address)

    def one(i: int) -> int:
        tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[i : i + 1])
        return int(client.infer("digits", [tensor]).as_numpy("logits").argmax())

    with ThreadPoolExecutor(max_workers=64) as pool:
        predictions = list(pool.map(one, range(64)))

    assert sum(p == label for p, label in zip(predictions, labels)) >= 62
    after = scrape(digits_server)
    batches = after["slimserve_batch_size"]
    labels_ = {"model": "digits", "variant": "original"}
    rows = sample_value(batches, "slimserve_batch_size_sum", **labels_) - sample_value(
        before, "slimserve_batch_size_sum", **labels_
    )
    passes = sample_value(batches, "slimserve_batch_size_count", **labels_) - sample_value(
        before, "slimserve_batch_size_count", **labels_
    )
    singles = sample_value(batches, "slimserve_batch_size_bucket", le="1.0", **labels_) - sample_value(
        before, "slimserve_batch_size_bucket", le="1.0", **labels_
    )
    assert rows == 64
    assert passes < 64 and singles < passes, f"{passes} forward passes for 64 requests, {singles} of size 1"
    requests = after["slimserve_requests"]
    assert sample_value(requests, "slimserve_requests_total", method="ModelInfer", code="OK") >= 64
    assert (
        sample_value(after["slimserve_model_load_duration_seconds"], "slimserve_model_load_duration_seconds", **labels_)
        > 0
    )
