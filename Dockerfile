# megatron-ovr for GPU clusters, on NVIDIA's NGC PyTorch image: it already carries the PyTorch build,
# Transformer Engine, apex, NCCL and cuDNN that NVIDIA tested together, and pins them in
# /etc/pip/constraint.txt (since 25.03), so nothing below can silently replace them.
#
#   docker build -t megatron-ovr:latest .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /data:/data -v /checkpoints:/checkpoints megatron-ovr:latest
#
# vLLM's PyPI wheels pin an exact PyPI torch, which the constraint file refuses (and which would break TE
# and apex). vLLM's documented route for an existing torch is a source build with its
# use_existing_torch.py: done once in the first stage, and only the wheel is carried over. Bump NGC_TAG
# and VLLM_VERSION together (vLLM's source must support the image's torch); tests/launch/test_dockerfile.py
# parses this file (`docker build` cannot run in CI).

ARG NGC_TAG=26.08-py3

# ---- stage 1: vLLM built against the image's own torch --------------------------------------------------
FROM nvcr.io/nvidia/pytorch:${NGC_TAG} AS vllm-build
ARG VLLM_VERSION=0.32.0
# Hopper and Blackwell by default; add 8.0 for A100 (each architecture adds build time).
ARG TORCH_CUDA_ARCH_LIST="9.0 10.0"
ARG MAX_JOBS=16
WORKDIR /build
RUN git clone --depth 1 --branch v${VLLM_VERSION} https://github.com/vllm-project/vllm.git \
    && cd vllm \
    && python use_existing_torch.py \
    && pip install -r requirements/build.txt \
    && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=${MAX_JOBS} \
       pip wheel --no-build-isolation --no-deps --wheel-dir /wheels .

# ---- stage 2: the runtime image ------------------------------------------------------------------------
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}
ARG VLLM_VERSION=0.32.0
ARG MODELOPT_VERSION=0.47.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Layers from the least to the most often changed: vLLM and modelopt (pinned), then this package's
# dependencies (change with setup.py), then its source (changes with every commit).
COPY --from=vllm-build /wheels /tmp/wheels
RUN pip install /tmp/wheels/vllm-${VLLM_VERSION}*.whl \
    && rm -rf /tmp/wheels
RUN pip install "nvidia-modelopt==${MODELOPT_VERSION}"

WORKDIR /opt/megatron-ovr
# Dependencies first, from setup.py alone (an empty package stands in for the source), so that a source
# change does not reinstall them.
COPY setup.py ./
RUN mkdir megatron_ovr && touch megatron_ovr/__init__.py \
    && pip install ".[gpu,sentencepiece]" \
    && pip uninstall -y megatron-ovr \
    && rm -rf megatron_ovr build *.egg-info

COPY megatron_ovr ./megatron_ovr
COPY tools ./tools
COPY examples ./examples
COPY README.md ./
RUN pip install --no-deps ".[gpu,sentencepiece]" \
    && rm -rf build *.egg-info \
    && python -c "from megatron_ovr import platform; print(platform.describe_backends())"

# A non-root user for `docker run`; enroot/pyxis and apptainer run as the calling user anyway.
RUN useradd --create-home --shell /bin/bash ovr \
    && mkdir -p /workspace \
    && chown ovr:ovr /workspace
USER ovr
WORKDIR /workspace
CMD ["bash"]
