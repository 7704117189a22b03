"""Stage 3: benchmark evaluation through the rollout engine (``harness``, files read by ``benchmarks``) and
the cognitive-behaviour analysis (``behaviors``, with the judge client ``judge`` and the offline loopback
judge ``judge_server``). ``commands`` holds the command lines."""
