#!/bin/bash
# megatron-ovr on several machines without SLURM: start this on every node, with the same command and the
# same MASTER_ADDR/MASTER_PORT/NNODES, and that node's NODE_RANK.
#
#   node 0:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 examples/multinode/torchrun_node.sh sft --config FILE
#   node 1:  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 examples/multinode/torchrun_node.sh sft --config FILE
#
# The command is a megatron-ovr subcommand (sft, ppo, eval, ...) or a tool script (tools/NAME.py ...).
# Environment (defaults in brackets):
#   MASTER_ADDR      address of node 0, reachable from every node; node 0 hosts the rendezvous store (required)
#   MASTER_PORT      a free TCP port on node 0 [29500]
#   NNODES           number of nodes (required)
#   NODE_RANK        this node, 0 .. NNODES-1 (required); global rank = NODE_RANK x NPROC_PER_NODE + local
#                    rank, so tensor-parallel groups (the fastest-varying ranks) stay inside a node
#   NPROC_PER_NODE   workers on this node [one per GPU from nvidia-smi -L; 1 without GPUs]
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun lets workers finish their checkpoint after SIGTERM [300]
# Often needed on real clusters (passed through to the workers):
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME  the interface between nodes when there are several (e.g. ib0)
#   NCCL_IB_HCA, NCCL_DEBUG=INFO             InfiniBand adapters; NCCL's own diagnosis of a hang
#   OMP_NUM_THREADS                          CPU threads per worker (torchrun sets 1 when unset)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: MASTER_ADDR=... NNODES=... NODE_RANK=... $0 <sft|ppo|eval|...|tools/SCRIPT.py> [args...]" >&2
    exit 2
fi
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's rank (0 .. NNODES-1)}"
if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
    echo "NODE_RANK=$NODE_RANK is outside 0 .. $((NNODES - 1)) (NNODES=$NNODES)" >&2
    exit 2
fi
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

if [[ $1 == *.py ]]; then
    entry=("$1")
else
    entry=(-m megatron_ovr "$1")
fi
set -x
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" "${entry[@]}" "${@:2}"
