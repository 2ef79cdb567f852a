//! What an attribute does depends on two things: which attribute it is
//! ([`Attr`]) and what it is on ([`Target`]): a struct or enum declares a
//! message type, an `async fn` registers a handler.

/// Which attribute.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Attr {
    Command,
    Event,
    /// Only on an `async fn`: a saga triggered by an event.
    Saga,
    /// Only on an `async fn`: a recurring job.
    Job,
}

/// What the attribute is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Target {
    /// A struct or enum: a message type.
    Type,
    /// An `async fn`: a handler.
    Handler,
}

/// One attribute on one kind of item.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Role {
    pub attr: Attr,
    pub target: Target,
}

impl Attr {
    /// `#[command]`
    pub(crate) fn name(self) -> &'static str {
        match self {
            Attr::Command => "#[command]",
            Attr::Event => "#[event]",
            Attr::Saga => "#[saga]",
            Attr::Job => "#[job]",
        }
    }

    /// "a #[command]", "an #[event]"
    pub(crate) fn a(self) -> &'static str {
        match self {
            Attr::Command => "a #[command]",
            Attr::Event => "an #[event]",
            Attr::Saga => "a #[saga]",
            Attr::Job => "a #[job]",
        }
    }

    /// "command", "event"
    pub(crate) fn noun(self) -> &'static str {
        match self {
            Attr::Command => "command",
            Attr::Event | Attr::Saga => "event",
            Attr::Job => "occurrence",
        }
    }

    /// The subject prefix of a message type without `subject`.
    pub(crate) fn subject_prefix(self) -> &'static str {
        match self {
            Attr::Command => "cmd",
            Attr::Event | Attr::Saga => "evt",
            Attr::Job => "catga.job",
        }
    }

    /// The catga trait of the message type, and of the handler.
    pub(crate) fn traits(self) -> (&'static str, &'static str) {
        match self {
            Attr::Command => ("Command", "CommandHandler"),
            Attr::Event | Attr::Saga => ("Event", "EventHandler"),
            Attr::Job => ("Event", "JobHandler"),
        }
    }
}

impl Role {
    /// "a command type", "an event handler"
    pub(crate) fn item(self) -> &'static str {
        match (self.attr, self.target) {
            (Attr::Command, Target::Type) => "a command type",
            (Attr::Event, Target::Type) => "an event type",
            (Attr::Command, Target::Handler) => "a command handler",
            (Attr::Event, Target::Handler) => "an event handler",
            (Attr::Saga | Attr::Job, Target::Type) => "a type",
            (Attr::Saga, Target::Handler) => "a saga",
            (Attr::Job, Target::Handler) => "a job",
        }
    }
}
