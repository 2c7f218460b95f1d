"""Who belongs to the network: the CA and its certificates, join tokens, the trust
store (chains and revocations) and the enrolment protocol a joiner speaks to a seed."""
