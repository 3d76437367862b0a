"""A node's rules, above the pure cache and below every protocol: who may
call (auth, peer_proofs), how often (ratelimit), which peer owns a key
(peers), and what each call does to the groups (node_rules.NodeRules)."""
