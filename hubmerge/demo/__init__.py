"""``hubmerge demo``: the whole workflow offline, on a trajectory trained on the spot from a toy grammar."""
