//! Routing (DESIGN.md section 5): the participants [`directory`], participants' [`mailbox`]es,
//! and the [`router`] that turns ingested events into mailbox deliveries.

pub mod directory;
pub mod mailbox;
pub mod router;
