"""An example metaserve plugin: a residual MLP (``resmlp``) and damped-oscillator regression
tasks (``oscillator``). See docs/PLUGINS.md in the metaserve repository."""
