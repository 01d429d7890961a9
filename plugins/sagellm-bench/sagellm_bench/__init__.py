"""`sagellm bench`: reproducible benchmarks that print their hardware, versions, command and peers.

One module per workload (`throughput`, `latency`, `serve`, `prefix`, `pd`); shared parts:
`workloads` (seeded request generation), `environment` (hardware / versions report), `hf_peer`
(transformers on the same weights), `floors` (measured matmul FLOP/s and memory bandwidth, and the
time floors they imply), `offline` (running sageLLM over a workload), `stats` (summaries),
`report` (JSON, markdown and PNG outputs) and `server_launch` (`serve --launch`). `sagellm_bench.cli` wires
them to argparse; `sagellm_bench.plugin` registers the `bench` command with the core.
"""
