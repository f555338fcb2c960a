"""Chat tasks: each file holds one source of conversations (and, for eval tasks, how to score
answers). tasks/common.py has the Task base, TaskMixture and the downloader.

    from tasks.gsm8k import GSM8K
    task = GSM8K(split="test", stop=100)       # the first 100 problems
    task[0] -> {"messages": [...], "answer": "72"}
"""
