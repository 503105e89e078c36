"""Checkpoints in Megatron-LM's layout, written atomically and verified on load.

The modules, each importing only those above it:

    manifest.py             what a published checkpoint is (tracker, iter_XXXXXXX,
                            manifest, each format's files) and the checks of a reader
    publish.py              the atomic publish both formats share (temporary directory,
                            manifest, rename, tracker last, recovery) and its collectives
    rng.py                  a rank's RNG states
    description.py          the run a checkpoint describes (its "args")
    strict_load.py          loads are strict: a checkpoint's model must be this run's
    legacy.py               --ckpt-format torch: one torch file per (TP, PP) position
    torch_dist.py           --ckpt-format torch_dist (the default): sharded on
                            torch.distributed.checkpoint, loads at any TP/PP/DP;
                            global_blocks.py and dcp_metadata.py are its helpers
    directory_checks.py     no run writes into a checkpoint or over another run's
    training_checkpoint.py  the training job's save and load, dispatching on the format
    checkpoint_args.py      --use-checkpoint-args: the model's flags from a checkpoint's
                            description, read before the job starts
    megatron_lm.py          Megatron-LM's own files, imported and exported
    conversion.py           whole models: merge, reshape TP/PP, export (offline tools)

This file only re-exports what the rest of the project imports.
"""
from megatron_sr.checkpointing.description import job_description
from megatron_sr.checkpointing.directory_checks import (check_save_directory,
                                                        unusable_output_directory)
from megatron_sr.checkpointing.legacy import load_state_file, save_checkpoint
from megatron_sr.checkpointing.manifest import (MANIFEST_FILENAME, TRACKER_FILENAME,
                                                CheckpointError, iteration_dir_name,
                                                rank_dir_name, read_manifest, read_tracker,
                                                read_tracker_value, resolve_checkpoint_dir)
from megatron_sr.checkpointing.publish import recover_interrupted_publish
from megatron_sr.checkpointing.strict_load import load_model_state
from megatron_sr.checkpointing.training_checkpoint import (finish_pending_save,
                                                           load_training_checkpoint,
                                                           save_training_checkpoint)

__all__ = ["MANIFEST_FILENAME", "TRACKER_FILENAME", "CheckpointError", "check_save_directory",
           "finish_pending_save", "iteration_dir_name", "job_description", "load_model_state",
           "load_state_file", "load_training_checkpoint", "rank_dir_name", "read_manifest",
           "read_tracker", "read_tracker_value", "recover_interrupted_publish",
           "resolve_checkpoint_dir", "save_checkpoint", "save_training_checkpoint",
           "unusable_output_directory"]
