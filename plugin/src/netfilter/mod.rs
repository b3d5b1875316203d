//! Netlink to netfilter, below every backend: the message framing and the ruleset
//! generation ([`netlink`]), nftables set-element batches and dumps ([`nft_elements`]),
//! and conntrack flushes over ctnetlink ([`conntrack`]).

pub mod conntrack;
pub mod netlink;
pub mod nft_elements;
