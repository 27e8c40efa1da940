"""The commands of `mobileiqa <command>` and launch/: one module each, flags and `main`.

A module defines its absl flags when it runs, so each is run alone as `__main__`
(`mobileiqa_jax.commands.dispatch.run_command`), never imported next to another.
"""
