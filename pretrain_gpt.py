"""Pretrain a GPT with megatron_sr: `torchrun --nproc_per_node N pretrain_gpt.py <Megatron flags>`.

Training is not wired yet: the distributed optimizer, training loop and
checkpointing land with the training issue.
"""
import sys

if __name__ == "__main__":
    sys.exit("pretrain_gpt.py: training is not wired yet (see the README's status section).")
