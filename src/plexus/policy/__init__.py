"""Network policy: documents (NetworkPolicy, CiliumNetworkPolicy, the admin tiers) parsed to one
model (``model``), its meaning written once (``evaluate``, which ``policy explain`` prints), and,
in the firewall, its compiled form (docs/policy.md says how they fit)."""
