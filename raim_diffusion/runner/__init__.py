"""The runner: run configs and presets, batch jobs and the ``raim`` command line.

It only calls the library (`RaimPipeline`, the stages, `raim_diffusion.files`) and holds no
image math.
"""
