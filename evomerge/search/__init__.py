"""The search: job specs, drivers (ask/tell), the evaluation loop, reports.

Follow one candidate: `generational.GenerationalLoop.step` asks the driver for a genome (`recorder.Recorder.ask`),
the space decodes it to a recipe, the runtime (`evomerge.runtime`) has a worker's scorer (`evomerge.scoring`)
evaluate it (`runtime.base.run_one`), the store records it (`Recorder.settle`), the driver is told its losses.
"""
