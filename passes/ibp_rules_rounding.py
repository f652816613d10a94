"""IBP rule of the deployed model's rounding leaves (`graphcert.rounding_leaves`): [-e, e], e the float32
rounding of the op that produced the leaf's first input, from the intervals of that op's inputs."""
from graphcert.passes.ibp_core import RULES
from graphcert.rounding_leaves import DOMAIN, OP_TYPE, leaf_interval

RULES.rule(OP_TYPE, domain=DOMAIN)(leaf_interval)
