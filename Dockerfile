# megatron_sr on NVIDIA's PyTorch container, which brings CUDA, NCCL, cuDNN,
# torch, triton, apex, numpy and tensorboard. Build, run, drivers: docs/docker.md.
#
#   docker build -t megatron_sr .
#   docker run --gpus all --rm --ipc=host megatron_sr bash tests/run.sh -m "not slow"
#   docker run --gpus all --rm -it megatron_sr torchrun --nproc-per-node 8 pretrain_gpt.py ...
#
# BASE_IMAGE: 25.06, the last release on CUDA 12 (12.9.1, PyTorch 2.8), runs on any driver
# of the CUDA 12 family (R535, R550, R570 ...: CUDA minor-version compatibility). Later
# releases are built on CUDA 13, whose minimum driver is R580: where the nodes have one,
# pass a newer tag with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEGATRON_SR_TEST_PYTHON=python

WORKDIR /workspace/megatron_sr

# The requirements of setup.py that the container lacks, and the test extras
# (extras_require["test"]: `bash tests/run.sh` runs the suite with this python,
# MEGATRON_SR_TEST_PYTHON, instead of building a virtualenv), installed under
# the container's pip constraints (/etc/pip/constraint.txt), which pin its torch.
RUN pip install sentencepiece regex tokenizers tiktoken \
        "pytest>=7" pytest-timeout "transformers>=5" safetensors matplotlib \
        "megatron-core>=0.16" psutil wandb

# torch and Triton at setup.py's floors (tests/test_dockerfile.py checks the pins
# against them): the container's own (PyTorch 2.8, Triton 3.3 in 25.06) are older
# than the fused AdamW kernel needs. The CUDA 12.8 build from PyTorch's index,
# so the image still runs on CUDA 12 drivers; PIP_CONSTRAINT= lifts the
# container's pins for this install only. The container's apex, torchvision and
# Transformer Engine were built against its torch and no longer import:
# megatron_sr then takes its unfused norms and gradient-accumulation paths.
RUN PIP_CONSTRAINT= pip install --index-url https://download.pytorch.org/whl/cu128 \
        "torch==2.10.0" "triton==3.6.0"

COPY . /workspace/megatron_sr
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "import megatron_sr.model, megatron_sr.inference, torch, triton; print('megatron_sr on torch', torch.__version__, 'triton', triton.__version__)"

# NVIDIA's entrypoint (the base image's own, restated) prints the container
# banner (and whether CUDA runs in forward-compatibility mode on this driver)
# and runs the command given to `docker run`; without one, a shell.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["bash"]
