"""tgda_attack: the TGDA data-poisoning attack of Lu, Kamath & Yu, "Indiscriminate Data Poisoning
Attacks on Neural Networks" (TMLR 2022), its baselines and its three-stage protocol, built on
hypergrad.total_grad."""
