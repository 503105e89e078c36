# megatron_sr on NVIDIA's PyTorch container, which brings CUDA, NCCL, cuDNN,
# torch, triton, apex, numpy and tensorboard. Build, run and mounts: docs/docker.md.
#
#   docker build -t megatron_sr .
#   docker run --gpus all --rm -it megatron_sr torchrun --nproc-per-node 8 pretrain_gpt.py ...
#
# BASE_IMAGE: any recent nvcr.io/nvidia/pytorch:<yy.mm>-py3 release.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/megatron_sr

# The requirements of setup.py that the container lacks. torch and triton stay
# the container's own CUDA builds: nothing here installs them, megatron_sr is
# installed with --no-deps, and the container's pip constraints file
# (/etc/pip/constraint.txt) pins them besides.
RUN pip install sentencepiece regex

COPY . /workspace/megatron_sr
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "import megatron_sr.model, megatron_sr.inference, torch; print('megatron_sr on torch', torch.__version__)"

# NVIDIA's entrypoint (the base image's own, restated) prints the container
# banner and runs the command given to `docker run`; without one, a shell.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["bash"]
