//! Where pods come from and where their annotation goes: the [`pods::PodSource`] trait
//! (with the simulator's file store and the fake), the Kubernetes API source with its
//! watch cache, merge-patch writeback and Events ([`api`], feature `kube`), and the
//! kubectl plugin's logic ([`kubectl`]).

#[cfg(feature = "kube")]
pub mod api;
#[cfg(feature = "kube")]
pub mod kubectl;
pub mod pods;
