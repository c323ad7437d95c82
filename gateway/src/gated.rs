//! A future that is polled only after it woke its task.
//!
//! A connection's task waits on three things at once: the connection itself, its idle
//! timer and its thread's drain signal. `select!` polls all three every time the task
//! wakes, and the task wakes once for every token it relays. Polling the timer registers
//! its waker again each time (about 300 instructions with the future around it) and
//! polling the `watch` behind the drain signal takes its lock (about 180); together that
//! was about a twentieth of what relaying a token costs, for two futures that have nothing
//! to say unless they woke the task themselves.
//!
//! [`Gated`] hands the inner future a waker of its own, which marks the inner future as
//! woken and passes the wake-up on to the task, and skips polling the inner future until
//! that mark is set. What the gate costs per poll is one uncontended compare-and-swap pair
//! (keeping the task's waker) and one swap.
//!
//! The relay's own idle timer does without it: the relay sets that timer's deadline itself,
//! so [`RelayBody`](crate::relay::RelayBody) only compares the task's waker with the one
//! it registered and the clock with the deadline, which is cheaper still on the path every
//! token takes. These two are futures whose moment of readiness nobody here knows (an
//! `async fn`'s loop, a `watch` change).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

pin_project_lite::pin_project! {
    /// `inner`, polled on its first poll and then only after it woke the task.
    pub struct Gated<F> {
        #[pin]
        inner: F,
        signal: Arc<Signal>,
        // The waker `inner` is polled with, made once: making one clones the `Arc`.
        waker: Waker,
    }
}

/// The inner future's wake-up: a mark, and the task to pass it on to.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Gated<F> {
    /// `inner`, behind the gate.
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            // The first poll goes through: it is how the inner future registers at all.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        Gated {
            inner,
            signal,
            waker,
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The task's waker is kept before the mark is read, so that a wake-up in between
        // still reaches the task.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// A future that counts its polls, keeps the last waker it was given, and is ready
    /// once `ready` is set.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        waker: std::sync::Mutex<Option<Waker>>,
        ready: AtomicBool,
    }

    struct Polled<'a>(&'a Probe);

    impl Future for Polled<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.0.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// A task waker that counts its wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_its_own_wake_up() {
        let probe = Probe::default();
        let task = Arc::new(Task::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let mut gated = std::pin::pin!(Gated::new(Polled(&probe)));

        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            probe.polls.load(Ordering::SeqCst),
            1,
            "the first poll goes through"
        );
        // The task wakes for other reasons (its connection had data): the inner future is
        // left alone.
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);

        // Its own wake-up reaches the task, and the next poll goes through.
        probe.ready.store(true, Ordering::SeqCst);
        let inner_waker = probe.waker.lock().unwrap().clone().unwrap();
        inner_waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_up_reaches_the_waker_of_the_latest_poll() {
        let probe = Probe::default();
        let (first, second) = (Arc::new(Task::default()), Arc::new(Task::default()));
        let mut gated = std::pin::pin!(Gated::new(Polled(&probe)));
        let first_waker = Waker::from(first.clone());
        assert!(gated
            .as_mut()
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        // The future moved to another task (as a select! branch can be polled by whoever
        // polls the select!): the wake-up must go there.
        let second_waker = Waker::from(second.clone());
        assert!(gated
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        probe.waker.lock().unwrap().clone().unwrap().wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gated_timer_fires_when_it_is_due() {
        let started = tokio::time::Instant::now();
        Gated::new(tokio::time::sleep(Duration::from_secs(3))).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
