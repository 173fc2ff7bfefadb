"""The tiny grid the grid tests share (tests/test_crash_safety.py, tests/test_grid_thieves.py):
one LeNet victim on 1500 MNIST images, the naive Knockoff thief with 400 notMNIST queries and
budgets 200/400, evaluated on 300 test images. A test appends its ``[[defense]]`` (and further
``[[attack]]``) tables."""

#: how the naive thief trains; thieves beside it train the same way
ATTACKER_TRAINING = """budgets = [200, 400]
epochs = 3
lr = 0.02
momentum = 0.9
test_subset = 300
"""

HEAD = f"""
[experiment]
name = "tiny"
seed = 7
device = -1
jobs = 2

[[victim]]
dataset = "MNIST"
arch = "lenet"
epochs = 2
lr = 0.05
momentum = 0.9
batch_size = 64
train_subset = 1500
test_subset = 300

[[attack]]
label = "knockoff-random"
policy = "random"
queryset = "notMNIST"
budget = 400
batch_size = 100
arch = "lenet"
{ATTACKER_TRAINING}
[eval]
batch_size = 100
test_subset = 300
"""
