"""`python -m simvlm_jax.launch {tpu-vm,xpk,slurm,local} --gin_file=... --name=RUN --work_dir=...
[--gin.X=V ...] [target options] [--dry_run]`: start a run on a Cloud TPU VM slice, on GKE (xpk or
a JobSet manifest), on a SLURM cluster, or as N processes on this machine. `--dry_run` prints
every command and rendered file exactly, and runs nothing. See docs/cluster.md.
"""
