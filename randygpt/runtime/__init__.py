"""The process machinery around the research core: the CLI's errors and signals, platforms
and devices, memory, the workdir. Nothing here is needed to read how a model trains."""
