"""How many channels each group loses: the same ratio everywhere or a global ranking
(`ratio`), or what it takes to meet a MACs/params target (`target`)."""
