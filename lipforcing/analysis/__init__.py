"""The teacher-trajectory analysis: what the teacher does step by step, and the recipe read from it.

`trajectory` runs the teacher (the 50-step ODE with and without CFG; the two-call Euler grid),
`scoring` measures decoded frames, `recipe` turns the measured curves into a distillation recipe.
"""
