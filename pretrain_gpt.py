"""Pretrain a GPT with megatron_sr.

    torchrun --nproc_per_node N pretrain_gpt.py --num-layers ... [Megatron-LM flags]

Every rank runs this file; `megatron_sr.training.pretrain` does the rest
(see `python pretrain_gpt.py --help` for the flags).
"""
from megatron_sr.training import main

if __name__ == "__main__":
    main()
