/**
 * The widget's frame: a launcher button and the chat panel, inside a shadow root on a host
 * element of its own, so the page's CSS cannot reach in and the widget's cannot leak out.
 *
 * The shadow root is open because Puppeteer's `pierce/` selectors (the browser tests) walk
 * `element.shadowRoot`, which is null for a closed root; isolation of styles is the same
 * either way, and a closed root would not keep the page's own scripts out of a widget they
 * could replace wholesale anyway.
 *
 * The stylesheet is a `<link>` inside the shadow root, pinned with the integrity the build
 * computed, so the tenant's SRI hash on the script covers the stylesheet too. The frame stays
 * hidden until the stylesheet has loaded, so the page never shows it unstyled.
 *
 * The panel's content is one "screen" at a time (consent answer needed, pre-chat form, chat,
 * ended) plus, above it, at most one modal dialog (consent, my data). One status line serves
 * them all, so notices and errors are always in the same place for eyes and screen readers.
 */

import type { Lang, Strings } from "./i18n";
import { type Child, focusFirst, h, type Modal, openModal, uid } from "./ui";

declare const __HAFEN_CSS_INTEGRITY__: string;

export interface Shell {
  readonly t: Strings;
  readonly lang: Lang;
  /**
   * The language of the organisation's texts (WidgetConfig.language), set as their `lang`
   * attribute: they may be in another language than the widget's own words. "" until known.
   */
  textLang: string;
  /** Replaces the panel's content. */
  screen(...children: Child[]): void;
  /** Shows a notice or an error in the status line ("" clears it). */
  status(text: string, kind?: "info" | "error"): void;
  /** Opens a modal dialog over the panel (see ui.openModal). */
  modal(dialog: HTMLElement, labelledBy: string, onEscape: () => void, focusDialog?: boolean): Modal;
  /** Closes the open dialog, if any, without an answer. */
  dismiss(): void;
  open(): void;
  close(): void;
  isOpen(): boolean;
  /** Closed launcher's text: whether a chat can be continued / a message arrived meanwhile. */
  setResume(resume: boolean): void;
  setUnread(unread: boolean): void;
  /** The "My data" button, shown while there is a visit. */
  setMyData(visible: boolean): void;
}

export interface ShellEvents {
  /** The visitor opened the panel (every time). */
  onOpen(): void;
  onMyData(): void;
}

export function mountShell(cssUrl: string, t: Strings, lang: Lang, events: ShellEvents): Shell {
  const host = document.createElement("hafen-widget");
  const root = host.attachShadow({ mode: "open" });

  const link = h("link", { rel: "stylesheet", href: cssUrl });
  if (__HAFEN_CSS_INTEGRITY__) {
    link.integrity = __HAFEN_CSS_INTEGRITY__;
    link.crossOrigin = "anonymous";
  }

  const titleId = uid("title");
  const panelId = uid("panel");
  const launcher = h("button", {
    type: "button",
    class: "launcher",
    "data-hafen": "launcher",
    "aria-expanded": "false",
    "aria-controls": panelId,
  });
  const myData = h(
    "button",
    { type: "button", class: "ghost", "data-hafen": "mydata-open", hidden: true },
    t.myData,
  );
  const closeButton = h("button", { type: "button", class: "ghost" }, t.close);
  const statusLine = h("p", { class: "status", "data-hafen": "status", role: "status" });
  const body = h("div", { class: "body", tabindex: -1 });
  // Dialogs cover the body but not the header and the status line, so a dialog's outcome
  // ("Deletion is blocked …") is read where every other notice is.
  const stage = h("div", { class: "stage" }, body);
  const panel = h(
    "section",
    { class: "panel", id: panelId, role: "dialog", "aria-labelledby": titleId, hidden: true },
    h("header", { class: "header" }, h("h2", { id: titleId }, t.panelTitle), myData, closeButton),
    statusLine,
    stage,
  );
  const frame = h("div", { class: "frame", lang, hidden: true }, panel, launcher);
  root.append(link, frame);

  link.addEventListener("load", () => {
    frame.hidden = false;
  });
  link.addEventListener("error", () => {
    console.warn("hafen-widget: the stylesheet did not load, so the chat stays hidden", cssUrl);
  });

  let resume = false;
  let unread = false;
  let modal: Modal | null = null;

  /** A screen marks the control to start at with `data-autofocus` (the message box, say). */
  function focusScreen() {
    const target = body.querySelector<HTMLElement>("[data-autofocus]");
    if (target) {
      target.focus();
    } else {
      focusFirst(body);
    }
  }

  /** The launcher says what a click on it does: close the panel, or open it (and to what). */
  function renderLauncher() {
    const open = !panel.hidden;
    launcher.setAttribute("aria-expanded", String(open));
    launcher.textContent = open
      ? t.launcherClose
      : unread
        ? t.launcherUnread
        : resume
          ? t.launcherResume
          : t.launcher;
  }

  const shell: Shell = {
    t,
    lang,
    textLang: "",
    screen(...children) {
      body.replaceChildren();
      for (const child of children) {
        if (child) {
          body.append(child);
        }
      }
      if (!panel.hidden && !modal) {
        focusScreen();
      }
    },
    status(text, kind = "info") {
      statusLine.textContent = text;
      statusLine.classList.toggle("error", kind === "error" && text !== "");
    },
    modal(dialog, labelledBy, onEscape, focusDialog) {
      modal?.close();
      const opened = openModal(stage, dialog, { labelledBy, onEscape, focusDialog: focusDialog ?? false });
      // The header stays clickable beside a dialog: "My data" must not replace a question
      // that is waiting for its answer.
      myData.disabled = true;
      modal = {
        element: dialog,
        close() {
          if (modal?.element === dialog) {
            modal = null;
            myData.disabled = false;
          }
          opened.close();
        },
      };
      return modal;
    },
    dismiss() {
      modal?.close();
    },
    open() {
      panel.hidden = false;
      unread = false;
      renderLauncher();
      // A dialog still waiting for an answer gets the focus back; else the screen.
      if (modal) {
        focusFirst(modal.element);
      } else {
        focusScreen();
      }
      events.onOpen();
    },
    close() {
      panel.hidden = true;
      renderLauncher();
      launcher.focus();
    },
    isOpen() {
      return !panel.hidden;
    },
    setResume(value) {
      resume = value;
      renderLauncher();
    },
    setUnread(value) {
      unread = value && !shell.isOpen();
      renderLauncher();
    },
    setMyData(visible) {
      myData.hidden = !visible;
    },
  };

  launcher.addEventListener("click", () => (shell.isOpen() ? shell.close() : shell.open()));
  closeButton.addEventListener("click", () => shell.close());
  myData.addEventListener("click", () => events.onMyData());
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      shell.close();
    }
  });

  renderLauncher();
  document.body.appendChild(host);
  return shell;
}
